"""`lgca eval`: accuracy of the scoring methods on labelled images, and the labelled scenes used to measure it."""
