# Metres per unit.
FACTORS = {"km": 1000.0, "m": 1.0, "cm": 0.01, "mm": 0.001}
