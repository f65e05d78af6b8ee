"""Using a trained model: test, freeze and export, checks, embeddings, model deviation, bias
change, and the ASE / torch-sim calculators."""
