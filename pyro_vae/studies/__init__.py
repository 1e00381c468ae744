"""Research drivers built on the library (not part of its core): the gradient-variance study."""
