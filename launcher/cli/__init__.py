"""The `launcher` command line, click only: parse, call the click-free modules of
`launcher`, map errors to exit codes. `main` holds the group and the config commands;
`run_commands` render / submit / status / logs / cancel / list; `output_commands` report and
pull."""
