"""What ann2snn writes and reads back: calibration profiles, SNN artifacts, NIR export."""
