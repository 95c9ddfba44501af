"""Label sets, datalists, splits, validation, transforms and importers for users' datasets."""
