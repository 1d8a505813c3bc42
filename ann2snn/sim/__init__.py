"""Running a spiking network over time: the simulation, its engine, spike and energy accounting, arousal control, data-parallel ranks."""
