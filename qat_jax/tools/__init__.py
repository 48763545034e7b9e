"""Tools around a run, above the training core: a run's checkpoint restored (`restore`) and
evaluated (`evaluate`), `qat-jax export` (`export`) into the packed format (`packed`), llama.cpp's
GGUF (`gguf_export`) or a Hugging Face directory (qat_jax.hf, in the core: training starts from
one), text generation (`generate`), the step's timing (`bench`) and its ahead-of-time compile
for a pod (`aot`)."""
