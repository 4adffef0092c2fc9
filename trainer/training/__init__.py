"""Training: data, batching, models, checkpoint writing, metrics, progress, the loop and the planner; imports core, inference, evals and demo."""
