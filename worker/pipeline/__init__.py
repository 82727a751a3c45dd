"""One module per stage, one pure function each: prompt -> tokens -> (engine) -> split."""
