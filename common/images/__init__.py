"""Image generation: the sequence generator, the three-view refiner, image metrics."""
