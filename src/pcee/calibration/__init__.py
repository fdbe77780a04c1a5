"""Confidence scores, reliability maps and confidence bounds."""
