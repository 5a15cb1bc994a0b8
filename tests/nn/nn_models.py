"""Plain-PyTorch models in torchvision's layout (module names, forward code), at toy widths, for the
pyfast.fuse tests: ResNet-18/50-style (BasicBlock / Bottleneck with `out += identity; out = self.relu(out)`)
and RegNet-style (`x = self.proj(x) + self.f(x)`; grouped 3x3; Sequential stages)."""
from collections import OrderedDict

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers, widths=(4, 8, 8, 8), num_classes=5):
        super().__init__()
        self.inplanes = 4
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, blocks, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_style(layers=(2, 2, 2, 2)):
    return ResNet(BasicBlock, layers)


def resnet50_style(layers=(3, 4, 6, 3)):
    return ResNet(Bottleneck, layers, widths=(2, 4, 4, 4))


def expected_resnet_fusions(model):
    """(kind, module names) of every fusion fuse() must report for a ResNet above."""
    found = [("conv_bn_relu", ("conv1", "bn1", "relu"))]
    for name, block in model.named_modules():
        if not isinstance(block, (BasicBlock, Bottleneck)):
            continue
        convs = 1 if isinstance(block, BasicBlock) else 2
        found += [("conv_bn_relu", (f"{name}.conv{i}", f"{name}.bn{i}", f"{name}.relu")) for i in range(1, convs + 1)]
        last = f"{name}.bn{convs + 1}"
        shortcut = (f"{name}.downsample.1",) if block.downsample is not None else ()
        found.append(("conv_bn_add_relu", (f"{name}.conv{convs + 1}", last, *shortcut, "+",  # fx records `+=` as `+`
                                           f"{name}.relu")))
    return found


# -- RegNet (torchvision.models.regnet layout) ---------------------------------------------------------

def conv_norm_act(cin, cout, kernel, stride=1, groups=1, activation=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if activation else []))


class BottleneckTransform(nn.Sequential):
    def __init__(self, width_in, width_out, stride, group_width):
        groups = width_out // group_width
        super().__init__(OrderedDict(a=conv_norm_act(width_in, width_out, 1),
                                     b=conv_norm_act(width_out, width_out, 3, stride, groups),
                                     c=conv_norm_act(width_out, width_out, 1, activation=False)))


class ResBottleneckBlock(nn.Module):
    def __init__(self, width_in, width_out, stride, group_width):
        super().__init__()
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = conv_norm_act(width_in, width_out, 1, stride, activation=False)
        self.f = BottleneckTransform(width_in, width_out, stride, group_width)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    def __init__(self, depths=(1, 2, 2), widths=(4, 8, 8), group_width=2, num_classes=5):
        super().__init__()
        self.stem = conv_norm_act(3, 4, 3, 2)
        stages, width_in = [], 4
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = [(f"block{i + 1}-{j}", ResBottleneckBlock(width_in if j == 0 else width, width, 2 if j == 0 else 1,
                                                               group_width)) for j in range(depth)]
            stages.append((f"block{i + 1}", nn.Sequential(OrderedDict(blocks))))
            width_in = width
        self.trunk_output = nn.Sequential(OrderedDict(stages))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width_in, num_classes)

    def forward(self, x):
        x = self.trunk_output(self.stem(x))
        return self.fc(self.avgpool(x).flatten(start_dim=1))


def expected_regnet_fusions(model):
    found = [("conv_bn_relu", ("stem.0", "stem.1", "stem.2"))]
    for name, block in model.named_modules():
        if not isinstance(block, ResBottleneckBlock):
            continue
        found += [("conv_bn_relu", (f"{name}.f.{k}.0", f"{name}.f.{k}.1", f"{name}.f.{k}.2")) for k in "ab"]
        if block.proj is not None:  # proj(x) + f(x): the first operand's BN is the main one
            found.append(("conv_bn_add_relu", (f"{name}.proj.0", f"{name}.proj.1", f"{name}.f.c.1", "+",
                                               f"{name}.activation")))
        else:
            found.append(("conv_bn_add_relu", (f"{name}.f.c.0", f"{name}.f.c.1", "+", f"{name}.activation")))
    return found


def settled(model):
    """BNs with momentum=None (cumulative average): after a couple of training steps the running statistics
    are the batches', so eval mode is as well-conditioned as training; with momentum 0.1 they are still
    mostly their initial (0, 1) and a deep, thin model's eval-mode float32 gradients are noise."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    return model
