# Metres per unit.
FACTORS = {"m": 1.0, "cm": 0.01, "mm": 0.001}
