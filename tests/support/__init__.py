"""Test helpers: a private containerd, a busybox image, an OBuilder-like world."""
