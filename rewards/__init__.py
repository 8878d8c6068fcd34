"""The method's shaped trajectory rewards and the two-stage curriculum."""
