"""From an ANN to a spiking graph: tracing and normalising the graph, equivalence checks, calibration statistics, bias ramps."""
