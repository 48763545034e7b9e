"""Tools around a run, above the training core: validation of a run's checkpoint and its
restore (`evaluate`), the packed export (`export`) and the llama.cpp one (`gguf_export`), text
generation (`generate`), the step's timing (`bench`) and its ahead-of-time compile for a pod
(`aot`)."""
