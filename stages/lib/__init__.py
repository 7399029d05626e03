"""Shared code of the stages, one module per concern so that each stage's
``deps:`` in dvc.yaml lists exactly the modules it imports."""
