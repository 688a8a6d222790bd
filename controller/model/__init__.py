"""Pure data: immutable records of the world, the plan, outcomes and errors. No I/O."""
