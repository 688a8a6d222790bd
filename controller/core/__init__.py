"""The algorithm: the planner, the executor, one pass, the loop. Talks to the world only through ports."""
