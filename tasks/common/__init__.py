"""What every stage shares: the vocabulary of MLflow names, report keys and artifact names
(`names`), how an error is told (`errors`), credentials kept out of every output (`secrets`),
and the progress lines a person sees (`progress`)."""
