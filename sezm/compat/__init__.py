"""DeePMD-kit compatibility: its checkpoint layout and parameter names mapped onto sezm modules."""
