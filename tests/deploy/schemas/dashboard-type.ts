// The tuneloop dashboard's type: Grafana's own Dashboard (@grafana/schema, the version compose
// runs), with exactly two allowances, both for what Grafana's Prometheus data source reads from
// places the core schema leaves open: an annotation's query fields (expr, step, titleFormat,
// textFormat, tagKeys) at its top level, and a query variable's `definition`.
import type { AnnotationQuery, Dashboard, VariableModel } from "@grafana/schema";

export type PrometheusAnnotation = AnnotationQuery & {
  expr: string;
  step: string;
  titleFormat: string;
  textFormat?: string;
  tagKeys: string;
};
export type QueryVariable = VariableModel & { definition: string };
export type TuneloopDashboard = Omit<Dashboard, "annotations" | "templating"> & {
  annotations: { list: PrometheusAnnotation[] };
  templating: { list: QueryVariable[] };
};
