"""The attack simulation: planting a backdoor by poisoned fine-tuning (`beear plant`)."""
