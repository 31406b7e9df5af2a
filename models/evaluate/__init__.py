"""Figures on held-out data: metrics, calibration, speed and the reports."""
