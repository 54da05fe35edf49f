"""What a run tells people while it trains: log lines and `progress.json` (`progress`),
the loss / lr history (`history`), the HTML report (`report`, `report_html`), webhooks
(`notify`) and the run's lifecycle events that drive them (`run_events`)."""
