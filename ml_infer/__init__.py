"""ml_infer: which inference strategy should I ship for this classifier, and what does it cost?"""

__version__ = "0.1.0"
