"""Assembling a run: the typed settings made once from the config (`settings`), the
components built from them (`build`: model, data, pipeline, checkpointer, loop) and the
entry that takes the lease, resumes and runs it (`run`)."""
