"""elastic_det: object-detection training that survives failures, preemption and changing world sizes."""

__version__ = "0.1.0"
