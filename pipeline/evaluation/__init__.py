"""TRM-style evaluation: augmented views of every test input, predictions mapped back by the
inverse augmentation, voting, pass@K and the ARC Prize submission."""
