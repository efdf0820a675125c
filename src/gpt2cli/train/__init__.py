"""Fine-tuning and from-scratch training of GPT-2: data, LoRA, the loop, checkpoints.

Modules: ``settings`` (validated options, stdlib only), ``data`` (documents to packed blocks),
``init`` (trainable models), ``lora`` (low-rank adapters), ``distributed`` (DDP setup),
``checkpoint`` (Hugging Face-layout output written atomically) and ``loop`` (``finetune``).
"""
