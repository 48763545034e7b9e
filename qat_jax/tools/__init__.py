"""Tools around a run, outside the training core: a run's checkpoint restored (`restore`) and
evaluated (`evaluate`), `qat-jax export` (`export`) into the packed format (`packed`), llama.cpp's
GGUF (`gguf_export`) or a Hugging Face directory (`hf`, which `model.init_from` also reads:
training starts from one), text generation (`generate`), the step's timing (`bench`), its
ahead-of-time compile for a pod (`aot`), sweeps of QAT fractions and bit widths branched off
one FP trunk (`sweep`), and `qat-jax prepare` (`prepare`: a corpus tokenized
into ArrayRecord shards)."""
