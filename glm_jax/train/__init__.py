"""Training programs, one module per stage, and the state, checkpoint and metrics they share."""
