"""The ReconcilePolicy model, its CRD, and settings resolved from flags, policy and defaults."""
