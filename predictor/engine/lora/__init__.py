"""LoRA adapters: PEFT adapters read and checked (``adapter``), the slots of stacked adapters one step serves
(``bank``), Kaito's mix merged into the weights as they load (``merge``)."""
