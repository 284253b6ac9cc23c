"""Training of either model family: the loop (it drives a family through pipeline.model.family's
`Training`), its pre-flight, checkpoints and sampler; and, until they move into the RLAN family's
folder, RLAN's objective (losses), batches, schedules and context gain."""
