"""What a sweep reads before any training: the checks of a job's model and data (`check`: formats, templates,
lengths, weights files, without torch), and the model and tasks the demo and the tests generate (`demo`: a tiny
Llama with a real tokenizer, SmolLM2 from its GGUF, the dates / arithmetic / word-problem tasks; `word_problems`)."""
