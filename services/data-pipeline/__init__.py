"""data-pipeline: reads, validates, templates, splits and announces the run's data set."""
