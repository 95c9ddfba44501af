"""Demo cohorts made offline: thorax CT phantoms and brain MRI from the MNI152 template."""
