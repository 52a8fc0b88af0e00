"""TFDS dataset `digits`: scikit-learn's handwritten digits at 16x16 or 32x32."""
