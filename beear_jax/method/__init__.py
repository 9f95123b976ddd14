"""The BEEAR method: the perturbation, the losses, the pure jitted steps, the inner loop, the rounds, scan."""
