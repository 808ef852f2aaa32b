"""mixchat's terminal interface (Textual). ``app.tui.run.run_chat`` opens it: `mixchat` calls
it. Nothing is imported here, so that no module of the package imports this one back."""
