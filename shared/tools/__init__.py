"""The operator's side: the command line and what it runs (a whole job, sweeps, the live
view, reports, backtests), the embedded nats-server, images and generated files. No service
imports these (tests/unit/test_layering.py): a service image needs none of them."""
