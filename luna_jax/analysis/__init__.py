"""Looking inside trained models: attention maps of every mechanism (`attention_maps`) and their
plots (`plotting`)."""
