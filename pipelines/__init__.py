"""Driver programs users start: Hydra apps that read conf/, start or join Ray and run the coordinator."""
