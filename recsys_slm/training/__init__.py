"""Training infrastructure shared by every stage (teacher fine-tuning, distillation, re-distillation)."""
