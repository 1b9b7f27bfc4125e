"""One module per ``gptflow`` subcommand."""
