"""Train state, optimizers, the generic step and loop, and one task per model family."""
