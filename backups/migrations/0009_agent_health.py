# Health from the agent's reports: the last scheduled run, and one email per late or silent incident.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("backups", "0008_part_checksum"),
    ]

    operations = [
        migrations.RemoveField(model_name="server", name="overdue_notified_at"),
        migrations.AddField(
            model_name="server", name="alerted_report_at", field=models.DateTimeField(blank=True, null=True)
        ),
        migrations.AddField(model_name="server", name="last_run_at", field=models.DateTimeField(blank=True, null=True)),
        migrations.AddField(model_name="server", name="last_result", field=models.CharField(blank=True, max_length=10)),
        migrations.AddField(
            model_name="server", name="last_message", field=models.CharField(blank=True, max_length=500)
        ),
    ]
