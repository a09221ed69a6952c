"""Many runs as DVC experiments: cross-validation by patient or site, the label-efficiency curve, `medtl exps`."""
