"""Fine-tuning tasks of VLMo: retrieval (ITC of the dual encoder), VQA and NLVR2 (the fusion encoder with the published
heads). heads: the published head modules; start: a task's model (image size, type rows, head) and its start
weights; vqa / nlvr2 / retrieval: the loss functions; answers: the VQA answer table; optim: the head learning-rate
multiplier; kinds: the loader, loss and evaluation of each task as a stage kind."""
