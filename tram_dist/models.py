"""Model heads the CLI can name with `model_class` (docs/trainer-and-cli.md: Fine-tuning CLI)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolBertForSequenceClassification(BertPreTrainedModel):
    """A linear classifier on the mean of the unpadded tokens' last hidden states.

    For sentence-embedding checkpoints trained with mean pooling, such as all-MiniLM-L6-v2: their
    [CLS] state barely varies between sentences (std about 5e-4 over a batch of movie reviews), so
    BertForSequenceClassification's [CLS] pooler starts from an almost constant feature and, in the
    demo's budget, does not learn. Loads any BERT checkpoint; its pooler weights go unused.
    """

    accepts_loss_kwargs = False  # the loss is a plain mean over the batch

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.bert.embeddings.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           **kwargs).last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
