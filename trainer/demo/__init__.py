"""The embedded demo dataset (generated tasks with IFEval constraints); imports core and evals."""
