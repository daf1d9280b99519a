// Validates custom resources against their CRD schemas, from the pinned @kubernetes-models
// packages (KEDA 2.19 CRDs, prometheus-operator). Reads a JSON array of manifests on stdin;
// prints one line per resource, and exits 1 when one does not validate.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const MODELS = { "keda.sh/v1alpha1/ScaledObject": ScaledObject, "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor };
let input = "";
for await (const chunk of process.stdin) input += chunk;
let bad = 0;
for (const doc of JSON.parse(input)) {
  const Model = MODELS[`${doc.apiVersion}/${doc.kind}`];
  if (!Model) continue;
  try {
    new Model(doc).validate();
    console.log(`ok ${doc.kind} ${doc.metadata.name}`);
  } catch (e) {
    bad += 1;
    console.log(`INVALID ${doc.kind} ${doc.metadata.name}: ${e.message}`);
  }
}
process.exit(bad ? 1 : 0);
